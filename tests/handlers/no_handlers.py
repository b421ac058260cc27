"""A module without a Handlers object."""

handlers = {"echo": print}
