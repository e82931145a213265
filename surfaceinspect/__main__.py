from surfaceinspect.cli import main

main()
