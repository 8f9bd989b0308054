"""Model families of the accuracy suite: each module names a pre-trained encoder, its tasks and its
fine-tuning recipe (NAME, DESCRIPTION, RECIPE, prepare, load_tasks, load_encoder)."""
