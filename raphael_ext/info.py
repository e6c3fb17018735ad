"""`python -m raphael_ext.info`: what raphael_ext was built with and what it runs on."""

from ._info import build_info


def main() -> None:
    info = build_info()
    runtime = info.pop("runtime")
    print("raphael_ext build")
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"  {key:<14} {value if value is not None else 'not built'}")
    print("runtime")
    for key, value in runtime.items():
        print(f"  {key:<15} {(', '.join(value) or 'none') if isinstance(value, list) else value}")


if __name__ == "__main__":
    main()
