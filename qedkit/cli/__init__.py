"""The qed command line (see qedkit.cli.main)."""
