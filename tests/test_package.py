"""The package's top level: ``ummae.create_model`` / ``ummae.list_models`` are the registry's
(imported on first use, so that ``import ummae`` stays light), and any other name is an
``AttributeError``."""

from __future__ import annotations

import pytest

import ummae
from ummae.models import registry


def test_package__create_model_and_list_models_are_the_registrys():
    assert ummae.create_model is registry.create_model
    assert ummae.list_models is registry.list_models
    assert "swin_test" in ummae.list_models()


def test_package__another_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        ummae.no_such_thing  # noqa: B018
