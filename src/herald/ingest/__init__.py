"""The watched drop folder: files of user ids become webhook deliveries (``herald watch``)."""
