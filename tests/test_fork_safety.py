"""DataLoader workers that use OpenCV must not hang after the parent process used OpenCV."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_forked_workers_can_use_cv2_after_parent_did():
    code = textwrap.dedent("""
        import numpy as np, cv2, torch
        import surfaceinspect  # sets OpenCV up for fork-safety
        from torch.utils.data import DataLoader, Dataset
        img = np.random.rand(512, 512).astype(np.float32)
        for _ in range(5):
            cv2.GaussianBlur(img, (0, 0), 5.0)
            cv2.resize(img, (300, 300))
        class D(Dataset):
            def __len__(self): return 8
            def __getitem__(self, i):
                return torch.from_numpy(cv2.GaussianBlur(img, (0, 0), 2.0)[:4, :4].copy())
        def init(_):
            cv2.setNumThreads(1)
        for batch in DataLoader(D(), batch_size=2, num_workers=2, worker_init_fn=init):
            pass
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
