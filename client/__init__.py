"""Stage workers, the pipeline driver and the Flower client app."""
