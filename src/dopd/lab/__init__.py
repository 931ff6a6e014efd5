"""The privilege lab: procedurally generated tasks with privileged hints, and the tiny pretrained
teacher/student pairs that the demo and the benchmark distil between.

``task`` defines the task interface, ``catalog`` the built-in tasks and ``load_task``
(``shiftmap`` is the default task); ``pretrain`` trains and saves a teacher/student pair and
measures its gates (``dopd pretrain``, ``gates``).
"""
