"""Model families behind one interface (:class:`stagewise.models.base.MultimodalModel`)."""
