"""``mbctl follow``: keep the host's filters equal to a blocklist the guest already keeps.

A follower reads a list of addresses the middlebox drops (an nftables set, an ipset) or the
virtual services it balances (IPVS), checks that offloading it would not change what the
middlebox does, and keeps the matching filters or redirects on the host in step with it
through the ivshmem channel.  Standard library only, plus the guest's own ``nft``,
``ipset`` and ``ipvsadm``.
"""
