"""The guest disk of an image as one file under a FUSE mount (``qed mount``)."""
