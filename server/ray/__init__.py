"""Mosaic on Ray Serve: one ingress, Mosaic replicas behind it, each request sent to a replica that holds
its adapter (``mosaic serve --ray``)."""
