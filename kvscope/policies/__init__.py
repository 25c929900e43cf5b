"""Prefix-cache eviction policies, one per module, behind one protocol (kvscope.policies.base.EvictionPolicy) and
one registry (kvscope.policies.registry). The policy lab (kvscope.lab) replays workloads through them; the paged
allocator takes the ones that need no side information through kvscope.policies.engine."""
