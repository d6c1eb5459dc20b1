"""eaas.registry"""
