"""EaaS: Expert-as-a-Service.

The routed experts of Mixture-of-Experts models served as stateless remote
functions (Liu et al., "Expert-as-a-Service", arXiv 2509.17863). See DESIGN.md.

Importing this package has no side effects: nothing is registered with
transformers, no Redis is contacted and no thread is started.
"""

__version__ = "0.1.0"
