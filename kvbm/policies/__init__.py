"""The leader's policies, one module each: which blocks a lower tier admits (`admission`). Eviction inside a tier
(lowest priority, then least recently used) is the slot pool's own order (`kvbm.leader.pool`)."""
