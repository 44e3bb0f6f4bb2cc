"""Generate with visual-token exit, or compare exit policies on a dataset split.

    python infer.py image=dyvte/testbed/data/images/test_00000.png question="what digit is on the purple diamond ?"
    python infer.py task=eval policies=[none,vtw,fastv,dynamic,fastv+dynamic,gsearch,psigmoid,gsearch+dynamic]
    python infer.py task=eval policies=[none,dynamic,random,downsample,tome,visionzip,pdrop,dart] budget=[64,128,192]
"""

from dyvte.infer import cli_main

if __name__ == "__main__":
    cli_main()
