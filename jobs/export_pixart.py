"""Job: `curation export-pixart` (it writes a local folder: run it where the InternData folder should be written).

ray job submit --working-dir . -- python jobs/export_pixart.py --output OUT --to /data/InternData ...
"""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-pixart", *sys.argv[1:]]))
