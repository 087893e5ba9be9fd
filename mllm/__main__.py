from mllm.cli import main

raise SystemExit(main())
