// The CUDA emulator stands in for <mma.h> (see emu_cuda.h).
#pragma once
#include "emu_cuda.h"
