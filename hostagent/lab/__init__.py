"""The lab: several real "hosts" on one machine, for `hostagent lab up --hosts N`.

A lab host is a Linux namespace set (network + mount + pid) with its own libvirtd and
virtlogd, its own underlay address on a shared bridge, and (later) its own agent:

    plan.py         pure: names, addresses, directories, failure domains of N hosts
    libvirtconf.py  pure: the per-host /etc/libvirt (why each setting differs)
    hostinit.py     PID 1 of a host's pid namespace: mounts, underlay, daemons, reaping
    hosts.py        start a host, stop it, run a command inside it (nsenter)
    links.py        the shared bridge and the hosts' veths (`ip link`)
    procs.py        /proc: children, pid namespaces, waiting for exits (pidfd)
    lifecycle.py    up and down of a whole lab; down finds leftovers of a crashed run

See docs/lab.md.
"""
