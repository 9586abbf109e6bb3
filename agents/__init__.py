"""Host-side tools: the per-hypervisor agent that serves each VM's channel, and the
``mbvisor`` command."""
