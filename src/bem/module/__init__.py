"""The core module (SPEC §1–3): the BEM layer and its trust region, the controller, causal routing at run time, the
config, and attaching / saving / loading it on a Hugging Face model. `from bem import ...` re-exports the public API."""
