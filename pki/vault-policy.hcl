# Policy for hostagent (every host's agent) with the default settings: mount prefix
# "hostagent", KV mount "hostagent-kv". Install it once:
#   bao policy write hostagent pki/vault-policy.hcl      (or: vault policy write ...)
# and give it to the agents' AppRole (token_policies=["hostagent"]) or token.
#
# The agent creates each cluster's CA mounts, roots and roles on first use and removes
# them when the cluster is deleted, so it manages mounts named hostagent-*; it has no
# rights anywhere else. Operators who want CA creation out of the hosts' hands can
# create the mounts, roots and roles themselves and grant only the sign, CA-read and KV
# paths (see docs/pki.md).

# Enable, tune and disable the per-cluster PKI mounts and the KV mount.
path "sys/mounts/hostagent-*" {
  capabilities = ["create", "read", "update", "delete"]
}

# Inside them: root generation, roles, sign, CA reads, listing and revoking issued
# certificates, auto-tidy configuration, the service-account keys (KV v2 data and
# metadata paths).
path "hostagent-*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}

# The agent's own token: renewed before it expires, looked up at start.
path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}
