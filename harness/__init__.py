"""The harness: what tests and exercises Branchline from outside, above both
the node and the relay side: the deterministic simulator (``harness.sim``),
the real-process soak (``harness.soak``), the fault-injecting TCP proxy
(``harness.faults``) and the demo (``harness.demo``). Runtime modules
(``engine``, ``adapters``) never import it (tests/test_harness_apart.py)."""
