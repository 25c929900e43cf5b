"""The policy lab: cache-only replay of a workload's prefix-cache accesses through eviction policies.

accesses: the workload as chains of block keys (Mooncake traces as given, kvscope workloads by their full blocks);
replay: one policy at one capacity under the lab's contract (docs/lab.md); oracle: predictions from the future with
a tunable error; sweep: many policies x capacities x errors -> a DataFrame; causes: why each miss happened.
"""
