"""Teachers: frozen pre-trained models behind one adapter interface.

``create_teacher(spec, **kwargs)`` with ``spec`` one of
``timm:<model>``, ``open_clip:<arch>/<tag or file>``, ``hf:<repo id or folder>``,
``python:<file.py or module>:<factory>``.
"""
from .base import Teacher, TeacherError, TeacherTokens, tokens_from_map
from .registry import TEACHER_SOURCES, create_teacher, register_teacher_source

__all__ = [
    "Teacher", "TeacherTokens", "TeacherError", "create_teacher", "register_teacher_source",
    "TEACHER_SOURCES", "tokens_from_map",
]
