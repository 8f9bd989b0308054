// neurokern::_launch_table's C++ entry (csrc/launch_table.cpp), for the kernels whose host side
// runs in C++ (csrc/list_launch.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace neurokern {

// (outputs, grad, [table, owner] per launch, info): see launch_table.cpp.
using LaunchTables =
    std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>>;

LaunchTables launch_table(c10::string_view op_name, at::TensorList base, at::TensorList finetuned,
                          std::optional<at::TensorList> grad, std::optional<at::IntArrayRef> offsets,
                          int64_t per_program, c10::string_view layout_name, bool outputs,
                          std::optional<at::ScalarType> out_dtype);

}  // namespace neurokern
