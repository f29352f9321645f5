"""The Ray runtime every job shares: the session, the actor layout, the scheduler and the actors."""
