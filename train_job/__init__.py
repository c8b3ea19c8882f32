"""train_job: SPADE training on Ray Train, data through Ray Data. Imports spade_core, never serve_app."""
