"""eaas.functions"""
