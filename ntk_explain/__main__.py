from ntk_explain.cli import main

main()
