"""Export a backbone, or a whole mmseg segmentor, to ONNX with dynamic sizes."""
from rest_mm.cli.export_onnx import main

if __name__ == '__main__':
    main()
