"""ibau-jax: I-BAU backdoor unlearning with compiled implicit hypergradients in JAX."""
__version__ = "0.2.0"
