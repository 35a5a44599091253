"""vLLM integration: the KVConnectorBase_V1 implementation and plugin registration.

Everything that imports vLLM lives here (and in ``serving/``).
"""
