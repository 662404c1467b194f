"""The family config-field classification (tests/test_model_family_fields.py) against transformers 5.x, which
PaddleFormers brings: the same tests, this environment's signatures."""

from test_model_family_fields import (  # noqa: F401
    test_every_config_field_of_the_family_is_classified,
    test_every_field_said_to_be_read_is_read,
    test_partial_rotary_is_read_for_glm_and_refused_where_the_forward_rotates_whole_heads,
)
