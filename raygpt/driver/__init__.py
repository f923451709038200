"""What runs in the launcher before and around Ray: the run plan and the resume decision, the checks
before Ray starts, connecting to Ray, building the trainer, and the run lock."""
