"""The privilege lab: procedurally generated tasks with privileged hints, and the tiny pretrained
teacher/student pairs that the demo and the benchmark distil between.

``task`` defines the task interface and ``load_task``; ``arithmetic`` is the default task;
``pretrain`` trains and saves a teacher/student pair (``dopd pretrain``).
"""
