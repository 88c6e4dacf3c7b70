"""Teachers: frozen pre-trained models behind the one backbone interface
(:class:`fdistill.backbone.Backbone`).

``create_teacher(spec, **kwargs)`` with ``spec`` one of
``timm:<model>``, ``open_clip:<arch>/<tag or file>``, ``hf:<repo id or folder>``,
``python:<file.py or module>:<factory>``.
"""
from .base import Backbone, Teacher, TeacherError, TeacherTokens, TokenMap, tokens_from_map
from .registry import TEACHER_SOURCES, create_teacher, register_teacher_source

__all__ = [
    "Teacher", "TeacherTokens", "Backbone", "TokenMap", "TeacherError", "create_teacher", "register_teacher_source",
    "TEACHER_SOURCES", "tokens_from_map",
]
