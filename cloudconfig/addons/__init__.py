"""The cluster add-ons a master applies from /etc/kubernetes/addons (k8s-addons.service).

Calico is Python data (`calico.py`: its version and images, the built-in manifests, and
the patching of an operator's own Calico release manifest). CoreDNS is a template of
each minor (`templates/<minor>/addons/coredns.yaml.j2`): its image follows the
Kubernetes minor, as kubeadm's does.
"""
