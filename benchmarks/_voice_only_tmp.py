import sys
from benchmarks.isolated import isolate
from benchmarks.voice import measure_voice
from devtools import REPOSITORY
from devtools.local_stack import LocalStack
isolate("bench-voice-", deadline_s=120)
with LocalStack(REPOSITORY) as stack:
    print(measure_voice(stack, int(sys.argv[1])))
