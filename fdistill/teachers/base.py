"""Teachers: frozen :class:`~fdistill.backbone.Backbone` s.

A teacher is a use of a backbone, not a kind of one: any adapter built by
:func:`fdistill.teachers.create_teacher` comes frozen (no gradients, eval mode whatever
``train()`` is asked, never handed to an optimizer). ``Teacher`` and ``TeacherTokens`` are the
names teacher code and user adapters (``python:`` factories, :func:`register_teacher_source`)
have always imported; they are :class:`~fdistill.backbone.Backbone` and
:class:`~fdistill.backbone.TokenMap`.
"""
from __future__ import annotations

from ..backbone import Backbone, Size2, TokenMap, to_2tuple, tokens_from_map
from ..errors import TeacherError  # the one hierarchy: fdistill.errors

__all__ = ["Teacher", "TeacherTokens", "TeacherError", "Size2", "to_2tuple", "tokens_from_map", "Backbone",
           "TokenMap"]

#: a teacher is a backbone used frozen (see module docstring)
Teacher = Backbone
TeacherTokens = TokenMap
