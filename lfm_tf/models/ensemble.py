"""A logit ensemble: the mean of its members' logits, as one Keras model.

LFM-DR's `--evaluate_learner=ensemble` deploys W1 and W2 together; export
and serving then see one classifier, images float [B, H, W, 3] -> logits
float [B, C], whose weights are its members' (saved and loaded as one
`.weights.h5`).
"""

import keras


class LogitEnsemble(keras.Model):
    """mean_m f_m(x), logits of classifiers sharing input and classes.

    Args:
      members: non-empty list of built classifiers, images -> logits [B, C].
      **kwargs: `keras.Model` arguments (name).
    """

    def __init__(self, members, **kwargs):
        super().__init__(**kwargs)
        if not members:
            raise ValueError(
                "Received no members; expected at least one classifier "
                "(W1 and W2 for evaluate_learner=ensemble).")
        self.members = list(members)
        # The members are built, so the ensemble is (and can be saved).
        self.built = True

    def call(self, images, training=False):
        total = self.members[0](images, training=training)
        for member in self.members[1:]:
            total = total + member(images, training=training)
        return total / len(self.members)
