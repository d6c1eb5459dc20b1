"""eaas.platform"""
