"""The agentic router (SPEC §4): its environment, policy, behaviour cloning and policy gradient."""
