"""Delivery channels: one protocol, one module per implementation."""
