"""Thin routes: parse -> call a service -> render."""
