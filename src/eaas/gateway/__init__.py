"""eaas.gateway"""
