"""Developer tools for tests, the demo and benchmarks; never imported by the agent."""
