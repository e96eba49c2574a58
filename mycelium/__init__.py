"""Mycelium: distil a teacher LLM's math reasoning into small specialists plus sympy.

The package holds only the plumbing every pipeline step shares: configuration
(`config`), the artifact store (`store`), dataset loading (`datasets`), model loading
(`teacher`), statistics for honest reporting (`stats`), reports (`reports`) and the
console command (`cli`). The steps themselves live in `tasks/`, the flows in `flows/`.
"""

__version__ = "0.1.0"
