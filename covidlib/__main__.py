from covidlib.cli import main

raise SystemExit(main())
