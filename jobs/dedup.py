"""Ray job: `curation dedup` on a cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/dedup.py --output s3://bucket/run ...

Inside a submitted job the code joins the job's cluster (RAY_ADDRESS); outside one, an embedded local Ray starts.
"""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup", *sys.argv[1:]]))
