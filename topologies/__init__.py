"""Lab topologies: namespace hypervisor, Mininet and QEMU launch scripts, host setup."""
