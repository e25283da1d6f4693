"""Job: `curation export-sana` (it writes a local folder: run it where Sana's data_dir should be written).

ray job submit --working-dir . -- python jobs/export_sana.py --output OUT --to /data/sana --vae-tag dcae --multiscale
"""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-sana", *sys.argv[1:]]))
